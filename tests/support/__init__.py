"""Helpers for the crash, concurrency and disk-full tests: real p2pvc processes
on throwaway repositories, and library reads that check what they left behind."""
