"""The study report: one static, self-contained HTML page built from the pipeline's outputs.

``html`` writes the markup, ``figures`` draws PNGs in memory, ``sections`` reads the
outputs of each stage into one section of the page, and ``build`` assembles them.
"""
