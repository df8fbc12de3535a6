"""Video transfer: reading and preprocessing frames (:mod:`.frames`), the embedded small LLaVA-NeXT-Video
(:mod:`.model`), per-frame retention of an evicting cache (:mod:`.retention`) and video question answering through
the evicting runtime (:mod:`.answer`). The adapter for ``LlavaNextVideoForConditionalGeneration`` lives in
:mod:`namm_transfer.adapters.llava_next_video`; the benchmarks in :mod:`namm_transfer.evals.video_qa`."""
