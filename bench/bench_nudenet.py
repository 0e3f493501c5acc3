"""NudeNet scoring: the package's one-image-at-a-time detector vs safediff's batched scorer.

Side by side in one run, on the same images (real photos from scikit-image, resized), same model
(the nudenet package's 320n.onnx) and the same onnxruntime thread count:

  reference   nudenet.NudeDetector().detect(path) per image (the package's documented use; its
              post-process loops over 2,100 candidate boxes in Python)
  package     nudenet.NudeDetector().detect_batch(paths, batch_size)
  ours-1      NudeNetScorer(batch_size=1).detect(paths): vectorised post-process only
  ours-B      NudeNetScorer(batch_size=B).detect(paths): one ONNX call per B images

All variants read the same PNG files (decode time included). The script checks that every
variant returns the reference's detections and prints images/s and the ratio to the reference.

  python bench/bench_nudenet.py                       # 48 images, 512 px, batch 16, 1 thread
  python bench/bench_nudenet.py --threads 4 --n 96 --batch 32
"""

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int, size: int) -> list[str]:
    """n PNGs of size x size: crops/flips of scikit-image's photos (faces, objects, scenes)."""
    import skimage.data as sd

    sources = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket(), sd.immunohistochemistry()]
    sources.append(np.stack([sd.camera()] * 3, axis=-1))
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        if (i // len(sources)) % 2:
            src = src[:, ::-1]
        im = Image.fromarray(np.ascontiguousarray(src)).resize((size, size), Image.BICUBIC)
        path = folder / f"{i:04d}.png"
        im.save(path)
        paths.append(str(path))
    return paths


def timed(fn: Callable[[], list], repeats: int) -> tuple[float, list]:
    """Best wall time of `repeats` calls (after one warm-up call) and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="images")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=16, help="batch size of the batched variants")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (best is kept)")
    args = ap.parse_args()

    import onnxruntime as ort
    from nudenet import NudeDetector

    from safediff.eval.scorers.nudenet import NudeNetScorer, default_model_path

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.n, args.size)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        ref = NudeDetector()
        # Same thread count for the package's session as for ours (its constructor takes none).
        ref.onnx_session = ort.InferenceSession(str(default_model_path()), opts)
        ours1 = NudeNetScorer(batch_size=1, num_threads=args.threads)
        oursb = NudeNetScorer(batch_size=args.batch, num_threads=args.threads)

        variants: list[tuple[str, Callable[[], list]]] = [
            ("reference: detect() per image", lambda: [ref.detect(p) for p in paths]),
            (f"package: detect_batch({args.batch})", lambda: ref.detect_batch(paths, args.batch)),
            ("ours: batch 1", lambda: ours1.detect(paths)),
            (f"ours: batch {args.batch}", lambda: oursb.detect(paths)),
        ]
        results = []
        for name, fn in variants:
            seconds, out = timed(fn, args.repeats)
            results.append((name, seconds, out))

    def canon(dets: list[list[dict]]) -> list[list[tuple]]:
        return [
            [(d.get("label", d.get("class")), d["box"], round(d["score"], 4)) for d in ds]
            for ds in dets
        ]

    reference = canon(results[0][2])
    n_det = sum(len(d) for d in results[0][2])
    print(
        f"NudeNet v3 320n, {args.n} images of {args.size}x{args.size} px, "
        f"{args.threads} onnxruntime thread(s), {n_det} detections in total"
    )
    print(f"{'variant':34s} {'images/s':>9s} {'x reference':>12s}  same detections")
    ref_rate = args.n / results[0][1]
    for name, seconds, out in results:
        rate = args.n / seconds
        same = canon(out) == reference
        print(f"{name:34s} {rate:9.1f} {rate / ref_rate:11.2f}x  {same}")
    batched = args.n / results[3][1]
    one = args.n / results[2][1]
    print(
        f"speed ratio, ours batch {args.batch} / reference one-by-one: {batched / ref_rate:.2f}x; "
        f"ours batch {args.batch} / ours batch 1: {batched / one:.2f}x"
    )


if __name__ == "__main__":
    main()
