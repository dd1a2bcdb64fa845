"""Offline half of mtrank: data -> model -> loss -> train loop -> evaluation -> export."""
