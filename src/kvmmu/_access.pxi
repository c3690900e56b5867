# Access verdicts (guest walk + permission_fault); included by _core.pyx.
