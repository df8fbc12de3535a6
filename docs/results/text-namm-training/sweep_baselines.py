import json, torch
torch.set_num_threads(1)
from namm_transfer.models import load_model
from namm_transfer.text_eval import TextGenerator
from namm_transfer.methods import cache_config_for, load_namm_option
from namm_transfer.evolve.validation import validation_items
from namm_transfer.answer_likelihood import answer_likelihood
from namm_transfer.namm.baselines import make_baseline
from namm_transfer.namm.budget import FixedRatioBudget
from namm_transfer.runtime.cache import CacheConfig
loaded = load_model("smollm2")
tasks = ("passkey","multikey_needle","kv_retrieval","variable_tracking","two_hop")
gen = TextGenerator(loaded.model, loaded.tokenizer, CacheConfig(update_every=256))
items = validation_items(gen, tasks, 4, 1024, (0.1,0.3,0.5,0.7,0.9))
full = {i.item_id: answer_likelihood(gen, i, None).mean_log_prob[0] for i in items}
out = {}
for rule in ["recency", "h2o"]:
    for ratio in [0.2, 0.5]:
        d, k = [], []
        for i in items:
            r = answer_likelihood(gen, i, make_baseline(rule, FixedRatioBudget(ratio)))
            d.append(r.mean_log_prob[0] - full[i.item_id]); k.append(r.kv_retained[0])
        out[f"{rule}@{ratio}"] = {"dense": sum(d)/len(d), "kv_retained": sum(k)/len(k)}
        print(rule, ratio, round(sum(d)/len(d),4), round(sum(k)/len(k),4), flush=True)
json.dump(out, open("runs/sweep_base.json","w"), indent=1)
