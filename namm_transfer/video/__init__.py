"""Video transfer: LLaVA-NeXT-Video with an evicting KV cache.

* :mod:`.frames`: decord reading, lmms-eval's uniform frame sampling, CLIP preprocessing written by hand;
* :mod:`.prompt`: the token ids of a video question (chat template, video placeholder expanded);
* :mod:`.model`: the embedded video model (SmolLM2 + a small CLIP tower trained here) and its trained parts;
* :mod:`.train`: ``python -m namm_transfer.video.train``, training the tower and projector on the built-in tasks;
* :mod:`.answer` and :mod:`.retention`: one video question through the evicting runtime, and what the cache kept of
  each frame;
* :mod:`.evaluation`, :mod:`.plots` and ``__main__``: ``python -m namm_transfer.video``, the comparison of the full
  cache, a NAMM and the baselines on video questions, with the per-frame retention heat map.

The adapter is :mod:`namm_transfer.adapters.llava_next_video`; the tasks and benchmarks are
:mod:`namm_transfer.evals.video_tasks` and :mod:`namm_transfer.evals.video_qa`.
"""
