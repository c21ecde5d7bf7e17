"""`lsdc grade`: any lumbar MRI study in (scanner or PACS DICOM folders, DICOMDIRs), a
per-study report, JSON and DICOM Structured Report out."""
