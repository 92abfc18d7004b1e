"""Local inputs (DICOM, PNG/JPEG, notes) rendered exactly as the reference MedGemma pipeline would see them."""
