"""One host's agent: the reconcile pass, the executor that carries a plan out, its state."""
