"""pairuni_jax: Pair-GRPO (PairUni) and a Pareto min-norm combiner for Janus-Pro, in JAX."""

__version__ = "0.1.0"
