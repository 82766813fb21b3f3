"""repro: faithful reproductions of ResNet (He et al. 2015) and MobileNet V1/V2."""

__version__ = "0.1.0"
