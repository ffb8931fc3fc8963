"""Attacks by a hostile server against the real hospital code (``HospitalSite.handle``)."""
