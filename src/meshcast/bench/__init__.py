"""Benchmarks behind `meshcast bench`: each suite returns plain numbers for JSON output."""
