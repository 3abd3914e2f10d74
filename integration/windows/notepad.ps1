param([string]$Drive = 'X:')
. "$PSScriptRoot\common.ps1"
# Notepad saves with CREATE_ALWAYS on the same name: an overwrite.
foreach ($text in 'one', 'two', 'three') {
    $f = [IO.File]::Open("$Drive\notes.txt", 'Create', 'Write', 'None')
    $b = [Text.Encoding]::UTF8.GetBytes($text); $f.Write($b, 0, $b.Length); $f.Dispose()
    & $Cairn sync | Out-Null
}
Check 'one version per Notepad-style save' ((Versions '/notes.txt').Count -eq 3) "$((Versions '/notes.txt').Count) versions"
Check 'content is the last save' ((Get-Content "$Drive\notes.txt") -eq 'three') 'content'
exit $script:Failures
