"""A small FHIR-style clinic service used by ``make demo`` and the end-to-end tests.

Not installed: put ``instrumentation/`` on ``sys.path`` and import ``sample.app`` and
``sample.traffic``. All data is synthetic.
"""
