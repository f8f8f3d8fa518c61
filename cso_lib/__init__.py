"""cso: Critical Step Optimization as Spark + Delta batch jobs."""

__version__ = "0.1.0"
