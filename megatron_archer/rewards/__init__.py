"""Verifiable rewards: math answers, code run in a sandbox, a synthetic arithmetic task, user functions."""
