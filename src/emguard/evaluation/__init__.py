"""EM evaluation: question sets, generation, judges, probes and metrics."""
