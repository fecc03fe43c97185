"""Benchmarks of the OpenAI-compatible LLM gateway (:mod:`leanscale.cascade.gateway`)."""
