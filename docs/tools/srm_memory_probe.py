"""Peak memory of SRM pretraining on the first N Kvasir training images (train, then pool), with
the raw SRM features kept in memory (``keep``) or left in the cache (``disk``); prints VmRSS /
VmHWM after the items and after 2 epochs of pretraining. Run with the CLI's allocator settings:

    MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432 \
    ALIGNSAM_DATA=../shared/data python docs/tools/srm_memory_probe.py disk 40 [compact] [no-trim]

``compact``: the stages and EfficientNet as ``compact:`` sources; ``no-trim``: the items are
collected without giving the heap's free pages back after each image (as before 2026-12-07).
"""

from __future__ import annotations

import sys
import time

import recalibration.items
from envs.data import kvasir_seg, shared_data_root
from recalibration.feature_set import FeatureSet
from recalibration.srm import SemanticRecalibrationModule, SRMConfig
from segmenter import EmbeddingCache, build_segmenter

SOURCES = ("sam", "sam_stages", "efficientnet_lite0")
COMPACT = ("sam", "compact:sam_stages", "compact:efficientnet_lite0")


def rss() -> tuple[str, str]:
    with open("/proc/self/status") as fh:
        status = dict(line.split(":", 1) for line in fh)
    return status["VmRSS"].strip(), status["VmHWM"].strip()


def main() -> None:
    keep, n, flags = sys.argv[1] == "keep", int(sys.argv[2]), set(sys.argv[3:])
    sources = COMPACT if "compact" in flags else SOURCES
    if "no-trim" in flags:
        recalibration.items.trim_heap = lambda: False
    seg = build_segmenter("mobile_sam")
    cache = EmbeddingCache()
    fs = FeatureSet(list(sources), seg, cache)
    root = shared_data_root() / "kvasir-seg"
    samples = (list(kvasir_seg(root, "train")) + list(kvasir_seg(root, "pool")))[:n]
    print("start", rss(), flush=True)
    items = recalibration.items.collect_items(
        samples, seg, cache, progress=False, features=fs, keep_features=keep
    )
    print("items", rss(), f"{n} images", flush=True)
    config = SRMConfig(branch="implicit", features=sources, reduce=256)
    channels = fs.channels(items[0][0], samples[0].load_image)
    srm = SemanticRecalibrationModule(config, channels, features=fs)
    t0 = time.perf_counter()
    srm.pretrain(items, epochs=2, rng=0, progress=False)
    print("pretrain", rss(), f"{time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
