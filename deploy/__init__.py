"""Deployment files and the small tools beside them (lock, scaling); not part of the installed package."""
