"""Model-independent evaluation: ShapesWorld and Digits data generators, automatic judges, harness and adapters.

Submodules: `shapes` (scenes, renderer, datasets, eval items), `judge` (object detection and scoring), `digits`
(real digits, their classifier), `harness` (evaluate_shapes / evaluate_digits), `adapters` (GenEval, DPG-Bench,
MMBench writers) and `cli` (the `cheers eval` sub-commands).
"""
