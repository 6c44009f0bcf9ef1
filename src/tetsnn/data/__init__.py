"""Datasets: static images (``static``) and event-camera recordings (``events``)."""
