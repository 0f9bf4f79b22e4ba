"""One module per merge method; each registers itself with `featurefusion.merge.registry.register`.

Every module in this package is imported when the registry is first used, so a new method is one new file
here (and its test).
"""
