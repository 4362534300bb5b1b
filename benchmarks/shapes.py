"""Problem sizes: the named presets and the `--shape` syntax."""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Shape:
    """Batch N and classes K always; C x H x W feature maps when the preset has them.

    With `dense`, logits are N x K x H x W (one row per position) instead of N x K.
    """

    n: int
    k: int
    c: int = None
    h: int = None
    w: int = None
    dense: bool = False

    @property
    def has_features(self):
        return self.c is not None

    def logit_shape(self):
        return (self.n, self.k, self.h, self.w) if self.dense else (self.n, self.k)

    def feature_shape(self):
        return (self.n, self.c, self.h, self.w)

    def describe(self):
        parts = [f"N={self.n}"]
        if self.has_features:
            parts.append(f"C={self.c}, {self.h}x{self.w}")
        parts.append(f"K={self.k}" + (" dense" if self.dense else ""))
        return ", ".join(parts)

    def as_dict(self):
        return asdict(self)


PRESETS = {
    "cifar": Shape(n=64, c=256, h=16, w=16, k=100),
    "imagenet": Shape(n=256, c=512, h=7, w=7, k=1000),
    "dense": Shape(n=8, c=256, h=128, w=128, k=19, dense=True),
    "llm-logits": Shape(n=4096, k=32000),
}
GPU_ONLY_PRESETS = frozenset({"llm-logits"})

# --quick measures a CIFAR-style hint at a quarter of the channels: the SoKDLoss step's
# 3x3 head convolutions then take well under a second on a small CPU, so the whole default
# run (cold torch.compile included) stays within two minutes.
QUICK_SHAPE = Shape(n=32, c=64, h=16, w=16, k=100)

SHAPE_SYNTAX = "N=8,C=16,H=8,W=8,K=10[,dense=1]  (or N=..,K=.. for logits only)"
_SIZE_KEYS = ("N", "K", "C", "H", "W")


def parse_shape(text):
    """'N=8,C=16,H=8,W=8,K=10' -> Shape; raises ValueError naming what is wrong."""
    fields = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(
                f"--shape items must look like KEY=VALUE, got {item!r}; syntax: {SHAPE_SYNTAX}"
            )
        if key not in _SIZE_KEYS + ("dense",):
            raise ValueError(f"--shape key {key!r} is not one of N, C, H, W, K, dense")
        if key in fields:
            raise ValueError(f"--shape gives {key} twice")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"--shape {key} must be an integer, got {value!r}") from None
        if key == "dense":
            if number not in (0, 1):
                raise ValueError(f"--shape dense must be 0 or 1, got {number}")
        elif number <= 0:
            raise ValueError(f"--shape {key} must be > 0, got {number}")
        fields[key] = number
    for key in ("N", "K"):
        if key not in fields:
            raise ValueError(f"--shape needs {key}; syntax: {SHAPE_SYNTAX}")
    feature_keys = [key for key in ("C", "H", "W") if key in fields]
    if feature_keys and len(feature_keys) != 3:
        raise ValueError("--shape needs all of C, H and W for feature maps, or none of them")
    dense = bool(fields.get("dense", 0))
    if dense and not feature_keys:
        raise ValueError("--shape dense=1 needs H and W for the dense logit map")
    return Shape(
        n=fields["N"],
        k=fields["K"],
        c=fields.get("C"),
        h=fields.get("H"),
        w=fields.get("W"),
        dense=dense,
    )
