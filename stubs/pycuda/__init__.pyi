# Minimal local stubs for pycuda (it ships none): exactly what device/ calls. See driver.pyi.
