"""ether-diffusion: ETHER / ETHER+ hyperplane-reflection adapters for Stable Diffusion."""

__version__ = "0.1.0"
