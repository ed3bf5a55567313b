"""Model-independent evaluation: the ShapesWorld and Digits benchmarks, automatic judges, harness and adapters.

Submodules: `shapes` (ShapesWorld eval items; the world itself is `cheers.shapes`), `judge` (scoring of images and
answers, over `detector` (object detection) and `answers` (answer normalisation)), `digits` (real digits, their
classifier), `harness` (evaluate_shapes / evaluate_digits), `sharpness`, `adapters` (GenEval, DPG-Bench, MMBench
writers) and `cli` (the `cheers eval` sub-commands).
"""
