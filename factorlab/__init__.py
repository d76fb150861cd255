"""factorlab: factorize a pretrained LM's FFNs into a Mixture of Experts (FactorLLM) and inspect it."""
__version__ = "0.1.0"
