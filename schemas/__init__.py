"""JSON Schemas for every operation, one file per operation, shipped as package data."""
