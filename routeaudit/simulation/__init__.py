"""Synthetic models with a planted effect of known size (``cases``) and what ``routeaudit
validate`` simulates for each audit (``plan``): the ground truth of every error-rate study."""
