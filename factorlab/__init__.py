"""factorlab: factorize a pretrained LM's FFNs into a Mixture of Experts (FactorLLM) and inspect it."""
import os

# OpenMP threads that spin while waiting make every op several times slower whenever the 2 CPU
# cores are shared (measured: ARC-Easy 290 s -> 52 s). Must be set before torch starts its pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# ...but a short spin before sleeping: PASSIVE alone made idle-machine decode 1.8x slower.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
