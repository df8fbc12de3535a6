import json, sys, torch
torch.set_num_threads(1)
from namm_transfer.models import load_model
from namm_transfer.text_eval import TextGenerator
from namm_transfer.methods import cache_config_for, load_namm_option
from namm_transfer.namm.features import NormalisationStats
from namm_transfer.evolve.validation import Validator, validation_items
loaded = load_model("smollm2")
tasks = ("passkey","multikey_needle","kv_retrieval","variable_tracking","two_hop")
out = {}
for name, path, biases in [("warm-start", "runs/warm-start/namm", [0.0, 0.5, 1.0, 2.0]), ("shipped", None, [0.0])]:
    w = load_namm_option(path)
    gen = TextGenerator(loaded.model, loaded.tokenizer, cache_config_for(w.config))
    v = Validator(gen, validation_items(gen, tasks, 4, 1024, (0.1,0.3,0.5,0.7,0.9)))
    if out:
        v.references = refs
    stats = NormalisationStats(w.norm_mean, w.norm_var)
    for b in biases:
        r = v(w.params, stats, w.config, keep_bias=b)
        out[f"{name}@{b}"] = {"dense": r["dense"], "kv_retained": r["kv_retained"]}
        print(name, b, round(r["dense"],4), round(r["kv_retained"],4), flush=True)
    refs = v.references
json.dump(out, open("runs/sweep.json","w"), indent=1)
