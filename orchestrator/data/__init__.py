"""Sharded Arrow datasets: writing shards, and streaming them to every rank."""
