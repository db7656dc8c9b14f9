"""Table 1 of the paper as data, and the named training scales of Section 3.1.

Each configuration lists its five blocks; a block lists its layers in the paper's own notation:
"conv3-64" is a 3x3 convolution with 64 output channels, "conv1-256" a 1x1 convolution, "LRN" a
local response normalisation. Every block ends with a 2x2 max-pool, the network with FC-4096,
FC-4096 and FC-<classes>.
"""

TABLE_1 = {
    "A": (
        ("conv3-64",),
        ("conv3-128",),
        ("conv3-256", "conv3-256"),
        ("conv3-512", "conv3-512"),
        ("conv3-512", "conv3-512"),
    ),
    "A-LRN": (
        ("conv3-64", "LRN"),
        ("conv3-128",),
        ("conv3-256", "conv3-256"),
        ("conv3-512", "conv3-512"),
        ("conv3-512", "conv3-512"),
    ),
    "B": (
        ("conv3-64", "conv3-64"),
        ("conv3-128", "conv3-128"),
        ("conv3-256", "conv3-256"),
        ("conv3-512", "conv3-512"),
        ("conv3-512", "conv3-512"),
    ),
    "C": (
        ("conv3-64", "conv3-64"),
        ("conv3-128", "conv3-128"),
        ("conv3-256", "conv3-256", "conv1-256"),
        ("conv3-512", "conv3-512", "conv1-512"),
        ("conv3-512", "conv3-512", "conv1-512"),
    ),
    "D": (
        ("conv3-64", "conv3-64"),
        ("conv3-128", "conv3-128"),
        ("conv3-256", "conv3-256", "conv3-256"),
        ("conv3-512", "conv3-512", "conv3-512"),
        ("conv3-512", "conv3-512", "conv3-512"),
    ),
    "E": (
        ("conv3-64", "conv3-64"),
        ("conv3-128", "conv3-128"),
        ("conv3-256", "conv3-256", "conv3-256", "conv3-256"),
        ("conv3-512", "conv3-512", "conv3-512", "conv3-512"),
        ("conv3-512", "conv3-512", "conv3-512", "conv3-512"),
    ),
}

CONFIG_NAMES = tuple(TABLE_1)
FC_WIDTH = 4096
MIN_INPUT_SIZE = 32  # five 2x2 poolings leave 1x1 at 32 px


def check_config(config):
    """Return the canonical name of `config` (case-insensitive), or raise listing the valid ones."""
    for name in TABLE_1:
        if str(config).upper() == name:
            return name
    raise ValueError(
        f"unknown VGG configuration {config!r}; valid configurations: {', '.join(CONFIG_NAMES)}"
    )


def parse_layer(spec):
    """'conv3-64' -> ('conv', 3, 64); 'LRN' -> ('lrn', None, None)."""
    if spec == "LRN":
        return "lrn", None, None
    kind, width = spec.split("-")
    return "conv", int(kind[len("conv"):]), int(width)
