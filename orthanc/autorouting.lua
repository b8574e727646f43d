-- Auto-routing of stable CT studies from Orthanc to the Liver Node.
--
-- When a study has received no new instance for "StableAge" seconds, each of its series
-- that is an axial CT image series and was not routed before is sent with C-STORE to the
-- DICOM modality named in LiverNodeRouting.Modality (an entry of "DicomModalities").
--
-- Never routed: series of another modality (the node's SEG and SR above all), series
-- whose Manufacturer is the node's, series received from the node's AE title, localizers
-- and non-axial series. A routed series gets the user metadata "LiverNodeRouted" (the
-- time it was sent), so a study that becomes stable again, for instance after the node's
-- results arrived, does not send the same series twice, even after Orthanc restarts.

local ROUTED_METADATA = 'LiverNodeRouted'

local function routing_settings()
  local configuration = GetOrthancConfiguration()
  local settings = configuration['LiverNodeRouting'] or {}
  return {
    modality = settings['Modality'] or 'livernode',
    node_ae_title = settings['NodeAETitle'] or 'LIVERNODE',
    node_manufacturer = settings['NodeManufacturer'] or 'Liver Node',
    routed_modalities = settings['RoutedModalities'] or { 'CT' },
    minimum_axial_cosine = tonumber(settings['MinimumAxialCosine'] or 0.9),
  }
end

local function trim(text)
  return ((text or ''):gsub('^%s+', ''):gsub('%s+$', ''))
end

local function contains(list, value)
  for _, item in ipairs(list) do
    if item == value then
      return true
    end
  end
  return false
end

local function metadata_names(level, id)
  return ParseJson(RestApiGet('/' .. level .. '/' .. id .. '/metadata'))
end

-- Cosine between the slice normal and the patient's cranio-caudal axis, from
-- ImageOrientationPatient ("rx\ry\rz\cx\cy\cz"); nil when the value is missing or malformed.
local function axial_cosine(orientation)
  local values = {}
  for number in string.gmatch(orientation or '', '[^\\]+') do
    table.insert(values, tonumber(number))
  end
  if #values ~= 6 then
    return nil
  end
  local normal_z = values[1] * values[5] - values[2] * values[4]
  return math.abs(normal_z)
end

-- Returns nil when the series must be routed, else the reason it is skipped.
local function skip_reason(series, settings)
  local modality = trim(series['MainDicomTags']['Modality'])
  if not contains(settings.routed_modalities, modality) then
    return 'modality ' .. modality .. ' is not routed'
  end
  if contains(metadata_names('series', series['ID']), ROUTED_METADATA) then
    return 'already routed'
  end

  local instance_id = series['Instances'][1]
  if instance_id == nil then
    return 'no instance'
  end
  local tags = ParseJson(RestApiGet('/instances/' .. instance_id .. '/simplified-tags'))
  if trim(tags['Manufacturer']) == settings.node_manufacturer then
    return 'a result of the node (Manufacturer ' .. settings.node_manufacturer .. ')'
  end
  if contains(metadata_names('instances', instance_id), 'RemoteAET') then
    local remote_aet = trim(RestApiGet('/instances/' .. instance_id .. '/metadata/RemoteAET'))
    if remote_aet == settings.node_ae_title then
      return 'received from the node (calling AE title ' .. remote_aet .. ')'
    end
  end
  if string.find(tags['ImageType'] or '', 'LOCALIZER', 1, true) then
    return 'a localizer'
  end
  local cosine = axial_cosine(tags['ImageOrientationPatient'])
  if cosine == nil then
    return 'no valid ImageOrientationPatient'
  end
  if cosine < settings.minimum_axial_cosine then
    return 'not axial (slice normal cosine ' .. string.format('%.2f', cosine) .. ')'
  end
  return nil
end

function OnStableStudy(studyId, tags, metadata)
  local settings = routing_settings()
  local all_series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))

  for _, series in ipairs(all_series) do
    local series_uid = series['MainDicomTags']['SeriesInstanceUID']
    local reason = skip_reason(series, settings)
    if reason ~= nil then
      print('LiverNodeRouting: series ' .. series_uid .. ' not routed: ' .. reason)
    else
      local request = '{"Resources": ["' .. series['ID'] .. '"], "Synchronous": true}'
      local answer = RestApiPost('/modalities/' .. settings.modality .. '/store', request)
      if answer == nil then
        print('LiverNodeRouting: sending series ' .. series_uid .. ' to modality ' ..
              settings.modality .. ' failed; it is tried again when the study is stable again')
      else
        RestApiPut('/series/' .. series['ID'] .. '/metadata/' .. ROUTED_METADATA, os.date('!%Y-%m-%dT%H:%M:%SZ'))
        print('LiverNodeRouting: series ' .. series_uid .. ' (' .. #series['Instances'] ..
              ' instances) sent to modality ' .. settings.modality)
      end
    end
  end
end
