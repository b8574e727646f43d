// Reads a DICOM SEG with dcmjs, the DICOM library the OHIF viewer builds on, and prints one
// JSON line per frame: the segment number, the source instance the frame refers to, the
// frame's Image Position (Patient), the number of set pixels and the SHA-256 of the
// unpacked frame (rows x columns bytes of 0 or 1, row by row).
//
// Usage: node read_seg.js SEG_FILE

'use strict';

const crypto = require('crypto');
const fs = require('fs');
const dcmjs = require('dcmjs');

function first(value) {
  return Array.isArray(value) ? value[0] : value;
}

function unpackBits(bytes, bitOffset, count) {
  const frame = Buffer.alloc(count);
  for (let index = 0; index < count; index += 1) {
    const bit = bitOffset + index;
    frame[index] = (bytes[bit >> 3] >> (bit & 7)) & 1;
  }
  return frame;
}

function main() {
  const path = process.argv[2];
  if (!path) {
    process.stderr.write('usage: node read_seg.js SEG_FILE\n');
    process.exit(2);
  }
  const file = fs.readFileSync(path);
  const buffer = file.buffer.slice(file.byteOffset, file.byteOffset + file.byteLength);
  const message = dcmjs.data.DicomMessage.readFile(buffer);
  const dataset = dcmjs.data.DicomMetaDictionary.naturalizeDataset(message.dict);

  if (dataset.SegmentationType !== 'BINARY') {
    throw new Error(`SegmentationType is ${dataset.SegmentationType}; this reader handles BINARY only`);
  }
  const rows = dataset.Rows;
  const columns = dataset.Columns;
  const frameCount = Number(dataset.NumberOfFrames);
  const pixelBytes = new Uint8Array(first(dataset.PixelData));
  const perFrame = dataset.PerFrameFunctionalGroupsSequence;
  if (!Array.isArray(perFrame) || perFrame.length !== frameCount) {
    throw new Error(`PerFrameFunctionalGroupsSequence has ${perFrame && perFrame.length} items for ${frameCount} frames`);
  }

  const summary = {
    transferSyntax: message.meta['00020010'].Value[0],
    rows,
    columns,
    frames: frameCount,
    segments: dataset.SegmentSequence.map((segment) => ({
      number: segment.SegmentNumber,
      label: segment.SegmentLabel,
    })),
  };
  process.stdout.write(`${JSON.stringify({ summary })}\n`);

  const pixelsPerFrame = rows * columns;
  perFrame.forEach((item, index) => {
    const derivation = first(item.DerivationImageSequence);
    const source = first(derivation.SourceImageSequence);
    const plane = first(item.PlanePositionSequence);
    const segment = first(item.SegmentIdentificationSequence);
    const frame = unpackBits(pixelBytes, index * pixelsPerFrame, pixelsPerFrame);
    let count = 0;
    for (const value of frame) {
      count += value;
    }
    process.stdout.write(`${JSON.stringify({
      frame: index + 1,
      segment: segment.ReferencedSegmentNumber,
      sopInstanceUid: source.ReferencedSOPInstanceUID,
      imagePositionPatient: plane.ImagePositionPatient.map(Number),
      setPixels: count,
      sha256: crypto.createHash('sha256').update(frame).digest('hex'),
    })}\n`);
  });
}

main();
