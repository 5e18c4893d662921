"""PACS in, results back: a DICOMweb client (`client`), DICOM SR results (`sr`), the scoring queue (`queue`) and
the `medvit watch` service (`watch`). Needs the `pacs` extra (highdicom, dicomweb-client)."""
