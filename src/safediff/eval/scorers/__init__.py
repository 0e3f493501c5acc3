"""Evaluation scorers behind one interface (`Scorer`, see `base`): each names its protocol.

  nudenet    NudeNetScorer    nudenet-v3/exposed9@0.6    NudeNet v3 ONNX detector, exposed classes
  q16        Q16Scorer        q16/vit-l-14               CLIP + two learned prompts, argmax
  clipscore  ClipScoreScorer  clipscore/vit-l-14         100 * max(cos(image, prompt), 0)
  fid        FIDScorer        fid/pytorch-fid-inception-v3 (or fid/<implementation>)

Modules are imported on use: onnxruntime, open_clip and pytorch-fid load only for the scorers a
run asks for.
"""

from safediff.eval.scorers.base import Scorer, make_aggregate, protocol_filename

__all__ = ["Scorer", "make_aggregate", "protocol_filename"]
