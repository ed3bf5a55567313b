"""Does a model fail multiple-choice questions because it cannot see, or because it cannot pick the letter?

Each MCQ of the ShapesWorld eval split is asked twice: as given (options + "Answer with the option's letter") and
as the plain question behind it, without options ("What color is the cross?"). Per subtype it reports how often the
plain answer is right, how often the letter is right, and how often the letter is the one of the option the plain
answer names. "plain right, letter wrong" is a binding failure: the model knows the answer but not its letter;
"next / previous option" count letters one option after / before the one the plain answer names (an off-by-one copy).
Position MCQs have no plain twin in the training data ("Where is the star relative to the square?" is only ever
asked with options), so their plain answers are not meaningful.

    python scripts/embedded/mcq_binding.py --model src/cheers/assets/cheers-shapes --n 100 --seed 1
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

from cheers.eval import judge as J
from cheers.eval import shapes as S
from cheers.pipeline import Cheers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=100, help="items per understanding type (about a quarter per subtype)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--no-space-options", action="store_true",
                    help="diagnostic, not the benchmark's format: ask 'B.purple' instead of 'B. purple', so that the "
                         "option word is the same token as a plain answer")
    a = ap.parse_args()
    model = Cheers.from_pretrained(a.model)
    items = [q for q in S.eval_prompts(a.seed, a.n, a.resolution, families=("understanding",))["understanding"]
             if q.qtype == "mcq"]
    images = [q.image for q in items]
    asked = [re.sub(r"^([A-D])\. ", r"\1.", q.question, flags=re.M) if a.no_space_options else q.question
             for q in items]
    letters = model.answer(images, asked)
    plain = model.answer(images, [q.question.split("\n")[0] for q in items])
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for q, said_letter, said_plain in zip(items, letters, plain):
        row = table[q.subtype]
        named = J.normalize_letter(said_plain, q.options)  # the letter of the option the plain answer names
        picked = J.normalize_letter(said_letter, q.options)
        row["n"] += 1
        row["plain_right"] += named == q.answer
        row["letter_right"] += picked == q.answer
        row["letter_matches_plain"] += named is not None and picked == named
        row["plain_right_letter_wrong"] += named == q.answer and picked != q.answer
        if named is not None and picked is not None:  # an off-by-one copy would pick a neighbour of the named option
            row["letter_is_next_option"] += ord(picked) - ord(named) == 1
            row["letter_is_previous_option"] += ord(picked) - ord(named) == -1
    subtypes = {k: dict(v) for k, v in sorted(table.items())}
    print(json.dumps({"model": a.model, "seed": a.seed, "no_space_options": a.no_space_options, "subtypes": subtypes},
                     indent=1))


if __name__ == "__main__":
    main()
