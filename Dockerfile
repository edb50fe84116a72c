# Custom SDK container for Dataflow workers: Beam's Python 3.11 SDK image with
# TensorFlow and this package (and so the bundled default model) preinstalled, so
# workers start without installing anything.
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPOSITORY/embexport:0.1.0 .
#   docker push REGION-docker.pkg.dev/PROJECT/REPOSITORY/embexport:0.1.0
#   python -m pipeline.run --runner DataflowRunner ... \
#       --sdk_container_image REGION-docker.pkg.dev/PROJECT/REPOSITORY/embexport:0.1.0
#
# The image's Beam SDK and Python must be the launcher's: Beam 2.77 (setup.py's pin)
# on Python 3.11.  tests/test_packaging.py checks this file against setup.py.
FROM apache/beam_python3.11_sdk:2.77.0

COPY setup.py MANIFEST.in README.md /tmp/embexport/
COPY models /tmp/embexport/models
COPY pipeline /tmp/embexport/pipeline
# A regular install puts the packages, the default bundle and the sample corpus in
# site-packages.  Naming the image's own Beam keeps pip from replacing the SDK that
# the boot program starts; TensorFlow comes with the package's requirements.
RUN pip install --no-cache-dir "apache-beam[gcp]==2.77.0" /tmp/embexport \
    && rm -rf /tmp/embexport \
    && python -c "import tensorflow, models.bundle, pipeline.running.export"

# Beam's boot program starts the SDK harness; Dataflow runs the image through it.
ENTRYPOINT ["/opt/apache/beam/boot"]
