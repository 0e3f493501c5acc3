"""The sandbox: a small, fully measurable text-to-image world (DESIGN.md section 8).

`scene` holds the scene description and the world's vocabulary, `render` draws scenes as 32 x 32
RGB images, `captions` is the caption grammar and the prompt splits (model training, GRPO training,
evaluation). Models trained on this world live beside these modules.
"""
