"""ShapesWorld: seeded scenes of simple coloured shapes, the world both training data and evaluation are built on.

Submodules: `world` (vocabulary, scene specs, geometry, rendering, random scene parts), `samples` (the seeded
prompts, questions, edits and text of every task kind), `datasets` (official-format jsonl writers) and `smoke`
(the small smoke corpus of the trainer's tests and benchmarks).
"""
