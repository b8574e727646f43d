"""Coded concepts used in the DICOM SEG and SR objects written by the node.

Every standard code below except :data:`ANATOMICAL_STRUCTURE` was checked against pydicom
3.0's concept dictionary (``pydicom.sr.codedict.codes``). The meanings are those of that
dictionary, spelled the same way, so that readers that compare meanings see no mismatch.

Choices worth knowing:

- Segmented property category of the liver: SCT 123037004 "Anatomical Structure", as the
  product specification requires. Current editions of CID 7150 (Segmentation Property
  Categories) use 123037004 with this meaning. pydicom 3.0 bundles an older dictionary, which
  lists 91723000 as CID 7150 "Anatomical Structure" and 123037004 as "Body structure", so this
  code is listed in :data:`CODES_NEWER_THAN_PYDICOM` instead of :data:`STANDARD_CODES`.
- Algorithm family: DCM 123110 "Artificial Intelligence" from CID 7162 (Surface Processing
  Algorithm Families, which highdicom uses for algorithm identification). Both networks are
  trained convolutional neural networks; CID 7162 has no narrower deep-learning code.
- Procedure reported: LOINC 25045-6 "CT unspecified body region", the CT member of CID 100
  (Quantitative Diagnostic Imaging Procedures). CID 100 has no abdomen- or liver-specific CT
  procedure.
- Volume unit: UCUM "mL". pydicom's dictionary has no millilitre concept (only ``cm3`` and
  ``mm3``), so the code is declared here with the UCUM code "mL" and meaning "milliliter".
- Tumour burden: no standard concept exists for the tumour volume as a percentage of the liver
  volume, so a private coding scheme :data:`PRIVATE_CODING_SCHEME_DESIGNATOR` is declared and
  identified in the SR's CodingSchemeIdentificationSequence
  (:data:`PRIVATE_CODING_SCHEME`).
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

# Segmentation: segmented property categories (CID 7150) and types (CID 7151/7154).
ANATOMICAL_STRUCTURE = CodedConcept("123037004", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")
LIVER = CodedConcept("10200004", "SCT", "Liver")
NEOPLASM = CodedConcept("108369006", "SCT", "Neoplasm")

# Algorithm identification (CID 7162).
ALGORITHM_FAMILY_ARTIFICIAL_INTELLIGENCE = CodedConcept("123110", "DCM", "Artificial Intelligence")

# Structured report.
PROCEDURE_CT_UNSPECIFIED_BODY_REGION = CodedConcept("25045-6", "LN", "CT unspecified body region")
VOLUME = CodedConcept("118565006", "SCT", "Volume")
DEVICE_OBSERVER_TYPE = CodedConcept("121007", "DCM", "Device")
COMMENT = CodedConcept("121106", "DCM", "Comment")
UNIT_MILLILITER = CodedConcept("mL", "UCUM", "milliliter")
UNIT_PERCENT = CodedConcept("%", "UCUM", "Percent")

# Private coding scheme for concepts that have no standard code.
PRIVATE_CODING_SCHEME_DESIGNATOR = "99LIVERNODE"
PRIVATE_CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=PRIVATE_CODING_SCHEME_DESIGNATOR,
    name="Liver Node private concepts",
    responsible_organization="Liver Node project",
    version="1",
)
TUMOR_BURDEN = CodedConcept("TB001", PRIVATE_CODING_SCHEME_DESIGNATOR, "Tumor burden")

# Codes whose value and meaning must match pydicom's dictionary; tests compare them.
STANDARD_CODES = {
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE": (MORPHOLOGICALLY_ABNORMAL_STRUCTURE, codes.SCT.MorphologicallyAbnormalStructure),
    "LIVER": (LIVER, codes.SCT.Liver),
    "NEOPLASM": (NEOPLASM, codes.SCT.Neoplasm),
    "ALGORITHM_FAMILY_ARTIFICIAL_INTELLIGENCE": (ALGORITHM_FAMILY_ARTIFICIAL_INTELLIGENCE, codes.cid7162.ArtificialIntelligence),
    "PROCEDURE_CT_UNSPECIFIED_BODY_REGION": (PROCEDURE_CT_UNSPECIFIED_BODY_REGION, codes.cid100.CTUnspecifiedBodyRegion),
    "VOLUME": (VOLUME, codes.SCT.Volume),
    "DEVICE_OBSERVER_TYPE": (DEVICE_OBSERVER_TYPE, codes.DCM.Device),
    "COMMENT": (COMMENT, codes.DCM.Comment),
    "UNIT_PERCENT": (UNIT_PERCENT, codes.UCUM.Percent),
}

# Codes whose meaning matches pydicom 3.0's dictionary but whose value follows a newer edition
# of the DICOM standard than that dictionary: our code, pydicom's entry for the same meaning,
# and the older value that pydicom lists.
CODES_NEWER_THAN_PYDICOM = {
    "ANATOMICAL_STRUCTURE": (ANATOMICAL_STRUCTURE, codes.cid7150.AnatomicalStructure, "91723000"),
}
