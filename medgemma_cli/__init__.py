"""medgemma-cli: MedGemma and MedSigLIP on your own machine — private, offline, fast."""

__version__ = "0.1.0"
