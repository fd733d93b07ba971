"""Test helpers: run a function on N gloo ranks (dist), drive the real CLI and its processes (faults),
network-namespace hosts (cluster_box)."""
