"""featurefusion: merge diffusion models (FeatureFusion, Diffusion Soup, ...) with streaming checkpoint I/O."""

__version__ = "0.1.0"
