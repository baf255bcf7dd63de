"""The README's before/after frame of a region edit: frame 4 of the region fixture's source clip and of diffusers'
edit (`reference/region/region.safetensors`, made by make_region_fixtures.py), side by side with the mask's outline,
each pixel drawn as an 8 × 8 block. Writes docs/region-before-after.png; rebuild with the environment of
requirements-image.txt:

    /tmp/kt-image/bin/python models/tiny/make_region_figure.py

The tiny model's weights are random, so the region holds noise-like texture: the figure shows where the edit
happens and that every pixel outside the mask is the source's, not what a real model draws.
"""

from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent
FRAME, SCALE, GAP = 4, 8, 8


def main():
    r = load_file(str(ROOT / "reference" / "region" / "region.safetensors"))
    before, after, mask = r["input_frames"][FRAME], r["frames"][FRAME], r["mask"][FRAME]
    assert np.array_equal(before[mask == 0], after[mask == 0]), "the edit keeps every pixel outside the mask"
    pixels = lambda frame: np.kron((frame * 255).round().astype(np.uint8), np.ones((SCALE, SCALE, 1), np.uint8))
    edge = np.kron(mask, np.ones((SCALE, SCALE)))
    outline = (edge != np.roll(edge, 1, 0)) | (edge != np.roll(edge, 1, 1))
    after_px = pixels(after)
    after_px[outline] = (255, 255, 0)
    h, w, _ = after_px.shape
    canvas = np.full((h, 2 * w + GAP, 3), 255, np.uint8)
    canvas[:, :w], canvas[:, w + GAP :] = pixels(before), after_px
    out = ROOT.parent.parent / "docs" / "region-before-after.png"
    Image.fromarray(canvas).save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
