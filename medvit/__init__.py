"""medvit: chest X-ray review with vision transformers."""

__version__ = "0.1.0"
