import torch
from namm_transfer.models import load_model
from namm_transfer.evals.video_tasks import KINDS, make_task, TaskConfig
from namm_transfer.video.train import task_question
m = load_model(None, dtype="float32", device="cpu"); tok = m.tokenizer
res = {k: [] for k in KINDS}
for kind in KINDS:
    for i in range(12):
        task, frames = make_task("heldout", kind, 16, i, TaskConfig(size=64))
        q = task_question(task)
        desc = "; ".join(f"frame {n.start}: a {n.colour} {n.shape}" for n in task.needles) if hasattr(task, "needles") else ""
        text = tok.apply_chat_template([{"role": "user", "content": f"Video: {desc}.\n{q.prompt()}"}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad(): logits = m.model(ids).logits[0, -1]
        letters = [tok(l, add_special_tokens=False).input_ids[0] for l in "ABCD"]
        pred = "ABCD"[int(logits[letters].argmax())]
        res[kind].append(pred == q.answer)
        if i == 0: print(text[-300:], "| answer", q.answer, "pred", pred)
for k, v in res.items(): print(k, sum(v), "/", len(v))
