"""A quick look at a model's drawings: twelve fixed prompts (single objects, colours, counts) in a 6 x 2 grid,
enlarged 2x. Seeds are 0..11 unless a base seed is given.

    python scripts/embedded/look.py MODEL OUT.png [SEED]
"""

from __future__ import annotations

import sys

from PIL import Image

from cheers.pipeline import Cheers

PROMPTS = ["A red circle.", "A blue square.", "A green triangle.", "A yellow star.", "A purple heart.", "A white cross.",
           "An orange heart.", "A white circle.", "A picture of a triangle.", "A star.", "Two circles.", "Three squares."]


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    model = Cheers.from_pretrained(sys.argv[1])
    seed = int(sys.argv[3]) if len(sys.argv) == 4 else 0
    images = model.generate_image(PROMPTS, seed=seed)
    w = images[0].width
    grid = Image.new("RGB", (w * 6, w * 2))
    for i, im in enumerate(images):
        grid.paste(im, ((i % 6) * w, (i // 6) * w))
    grid.resize((w * 12, w * 4), Image.NEAREST).save(sys.argv[2])


if __name__ == "__main__":
    main()
