import torch
from namm_transfer.models import load_model
from namm_transfer.evals.video_tasks import KINDS, make_task, TaskConfig
from namm_transfer.video.train import describe_task
m = load_model(None, dtype="float32", device="cpu"); tok = m.tokenizer
res = {k: [] for k in KINDS}
for kind in KINDS:
    for i in range(12):
        task, _ = make_task("heldout", kind, 16, i, TaskConfig(size=64))
        opts = "\n".join(f"- {o}" for o in task.options)
        msg = f"{describe_task(task)}\n{task.question}\nOptions:\n{opts}\nAnswer with one of the options, exactly as written."
        text = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        out = m.model.generate(ids, max_new_tokens=8, do_sample=False)
        ans = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip().lower().rstrip(".")
        right = task.options["ABCD".index(task.answer)].lower()
        res[kind].append(ans == right or ans.startswith(right))
        if i < 2: print(kind, repr(ans), "|", right)
for k, v in res.items(): print(k, sum(v), "/", len(v))
