"""DICOM in and out of a PACS: a series' results as DICOM (``report``), a DICOM node that receives
series and sends results back (``node``, ``destinations``), and sample series to try it on (``sample``)."""

from ..extras import require

require("pacs", "DICOM results and the DICOM node (braintumor.pacs)")
