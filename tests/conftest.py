"""Shared test configuration: float64 is available, and every test states its dtype."""
import jax

jax.config.update("jax_enable_x64", True)
